//! Parsing `/v2/...` paths into endpoints, from the right end (names may contain `manifests`,
//! `blobs`, any number of `/`). Names, references and digests are validated here, before any
//! handler runs — so nothing below the edge sees an unparsed string.

use crate::oci::{Digest, ErrorCode, Reference, ReferenceError, RegistryError, RepoName};

/// A parsed `/v2/` endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/referrers/<digest>` (OCI 1.1)
    Referrers(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/` (no id: open a session, mount, monolithic upload) or
    /// `/v2/<name>/blobs/uploads/<id>` (a session)
    Upload(RepoName, Option<String>),
}

fn name(s: &str) -> Result<RepoName, RegistryError> {
    s.parse::<RepoName>()
        .map_err(|e| RegistryError::new(ErrorCode::NameInvalid, e.to_string()))
}

fn digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse::<Digest>()
        .map_err(|e| RegistryError::new(ErrorCode::DigestInvalid, e.to_string()))
}

fn unknown_endpoint(path: &str) -> RegistryError {
    RegistryError::new(
        ErrorCode::NameUnknown,
        format!("no such endpoint: {}", crate::oci::digest::truncate(path)),
    )
}

const UPLOADS: &str = "/blobs/uploads";

/// Parses the path after `/v2/`.
pub fn parse(rest: &str) -> Result<Endpoint, RegistryError> {
    if rest.is_empty() {
        return Ok(Endpoint::Base);
    }
    if rest == "_catalog" {
        return Ok(Endpoint::Catalog);
    }
    // Structure is found on literal '/' only; an encoded `%2F` or `%2e` stays inside its
    // component, whose grammar (name, tag or digest) then rejects the '%'.
    if let Some(n) = rest.strip_suffix("/tags/list") {
        return Ok(Endpoint::Tags(name(n)?));
    }
    // Pushes, also matched at the right end: `<name>/blobs/uploads[/]` or
    // `<name>/blobs/uploads/<id>` — a name may itself contain `blobs/uploads`.
    if let Some(n) = rest.strip_suffix(UPLOADS) {
        return Ok(Endpoint::Upload(name(n)?, None));
    }
    if let Some((head, id)) = rest.rsplit_once('/') {
        if let Some(n) = head.strip_suffix(UPLOADS) {
            let id = (!id.is_empty()).then(|| id.to_string());
            return Ok(Endpoint::Upload(name(n)?, id));
        }
    }
    let (head, last) = rest
        .rsplit_once('/')
        .ok_or_else(|| unknown_endpoint(rest))?;
    let (n, kind) = head
        .rsplit_once('/')
        .ok_or_else(|| unknown_endpoint(rest))?;
    match kind {
        "manifests" => {
            let repo = name(n)?;
            let reference = last.parse::<Reference>().map_err(|e| match e {
                ReferenceError::Tag(t) => RegistryError::new(ErrorCode::TagInvalid, t.to_string()),
                ReferenceError::Digest(d) => {
                    RegistryError::new(ErrorCode::DigestInvalid, d.to_string())
                }
            })?;
            Ok(Endpoint::Manifest(repo, reference))
        }
        "blobs" => {
            let repo = name(n)?;
            Ok(Endpoint::Blob(repo, digest(last)?))
        }
        "referrers" => {
            let repo = name(n)?;
            Ok(Endpoint::Referrers(repo, digest(last)?))
        }
        _ => Err(unknown_endpoint(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn code(rest: &str) -> ErrorCode {
        parse(rest).unwrap_err().code
    }

    #[test]
    fn endpoints_parse_from_the_right() {
        assert_eq!(parse("").unwrap(), Endpoint::Base);
        assert_eq!(
            parse(&format!("a/b/referrers/{D}")).unwrap(),
            Endpoint::Referrers("a/b".parse().unwrap(), D.parse().unwrap())
        );
        assert_eq!(parse("_catalog").unwrap(), Endpoint::Catalog);
        assert!(
            matches!(parse("a/b/tags/list").unwrap(), Endpoint::Tags(n) if n.as_str() == "a/b")
        );
        match parse("manifests/blobs/manifests/latest").unwrap() {
            Endpoint::Manifest(n, Reference::Tag(t)) => {
                assert_eq!((n.as_str(), t.as_str()), ("manifests/blobs", "latest"))
            }
            other => panic!("{other:?}"),
        }
        match parse(&format!("library/alpine/blobs/{D}")).unwrap() {
            Endpoint::Blob(n, d) => {
                assert_eq!((n.as_str(), d.to_string().as_str()), ("library/alpine", D))
            }
            other => panic!("{other:?}"),
        }
        let x: RepoName = "x".parse().unwrap();
        assert_eq!(
            parse("x/blobs/uploads/").unwrap(),
            Endpoint::Upload(x.clone(), None)
        );
        assert_eq!(
            parse("x/blobs/uploads/uuid-1").unwrap(),
            Endpoint::Upload(x, Some("uuid-1".into()))
        );
    }

    #[test]
    fn a_name_containing_blobs_uploads_is_a_pull_not_a_push() {
        match parse("a/blobs/uploads/manifests/latest").unwrap() {
            Endpoint::Manifest(n, Reference::Tag(t)) => {
                assert_eq!((n.as_str(), t.as_str()), ("a/blobs/uploads", "latest"))
            }
            other => panic!("{other:?}"),
        }
        match parse(&format!("blobs/uploads/x/blobs/{D}")).unwrap() {
            Endpoint::Blob(n, d) => {
                assert_eq!((n.as_str(), d.to_string().as_str()), ("blobs/uploads/x", D))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("a/blobs/uploads/tags/list").unwrap(),
            Endpoint::Tags(n) if n.as_str() == "a/blobs/uploads"
        ));
        // Uploads are still recognised at the right end, whatever the name holds.
        let upload = |n: &str, id: Option<&str>| {
            Endpoint::Upload(n.parse().unwrap(), id.map(str::to_string))
        };
        assert_eq!(parse("x/blobs/uploads").unwrap(), upload("x", None));
        assert_eq!(
            parse("a/blobs/uploads/b/blobs/uploads/").unwrap(),
            upload("a/blobs/uploads/b", None)
        );
        assert_eq!(
            parse("a/blobs/uploads/blobs/uploads/uuid-1").unwrap(),
            upload("a/blobs/uploads", Some("uuid-1"))
        );
        // Nothing after the upload id: `<name>/blobs/uploads/<id>/more` is no endpoint.
        assert_eq!(code("x/blobs/uploads/uuid-1/more"), ErrorCode::NameUnknown);
    }

    #[test]
    fn bad_parts_get_their_codes() {
        assert_eq!(code("UPPER/manifests/latest"), ErrorCode::NameInvalid);
        assert_eq!(code("../etc/manifests/latest"), ErrorCode::NameInvalid);
        assert_eq!(code("a/%2e%2e/manifests/latest"), ErrorCode::NameInvalid);
        assert_eq!(code("a/manifests/%2e%2e"), ErrorCode::TagInvalid);
        assert_eq!(
            code("a/blobs/..%2f..%2fetc%2fpasswd"),
            ErrorCode::DigestInvalid
        );
        assert_eq!(code("a%2fb/tags/list"), ErrorCode::NameInvalid);
        assert_eq!(code("a/manifests/-bad"), ErrorCode::TagInvalid);
        assert_eq!(code("a/manifests/sha256:xyz"), ErrorCode::DigestInvalid);
        assert_eq!(code("a/blobs/sha256:xyz"), ErrorCode::DigestInvalid);
        assert_eq!(code("a/blobs/latest"), ErrorCode::DigestInvalid);
        assert_eq!(code("a/unknown/x"), ErrorCode::NameUnknown);
        assert_eq!(code("justone"), ErrorCode::NameUnknown);
        let long = format!("{}/manifests/latest", "a/".repeat(10_000));
        assert_eq!(code(&long), ErrorCode::NameInvalid);
    }
}
