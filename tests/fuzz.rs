//! Property-based fuzzing (proptest) of every parser that sees client input before a path, key
//! or upstream URL is built: repository names, tags, references, digests, whole `/v2/` paths,
//! `Accept` headers, blob `Range` headers, policy globs, htpasswd files and config sizes/durations.
//!
//! Two kinds of properties: *no input panics* (arbitrary strings, including non-ASCII, NUL,
//! `%`-escapes and huge inputs), and *what is accepted is safe and exact* (accepted names and
//! digests can never spell a traversal or an escape; grammatical input round-trips).
//!
//! CI runs the default number of cases (256 per property, a few seconds). Long runs:
//!
//! ```sh
//! PROPTEST_CASES=1000000 cargo test --release --test fuzz
//! ```
//!
//! A failure prints the minimal input proptest shrank it to, and saves the seed under
//! `tests/fuzz.proptest-regressions` so the case is replayed on every later run (commit it).
//! `cargo fuzz` needs a nightly toolchain, which this project does not assume.

use std::str::FromStr;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use stowage::http::route::{self, Endpoint};
use stowage::oci::{Accept, Digest, Reference, RepoName, Tag};
use stowage::policy::Pattern;

/// One name component by the distribution grammar.
const COMPONENT: &str = "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}";

fn valid_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::string::string_regex(COMPONENT).unwrap(), 1..6)
        .prop_map(|c| c.join("/"))
        .prop_filter("at most 255 characters", |n| n.len() <= 255)
}

/// A grammatical name whose components are often the path keywords (`blobs`, `uploads`,
/// `manifests`, `tags`, `list`): routing must still find the structure from the right.
fn keyword_name() -> impl Strategy<Value = String> {
    let component = prop_oneof![
        Just("blobs".to_string()),
        Just("uploads".to_string()),
        Just("manifests".to_string()),
        Just("tags".to_string()),
        Just("list".to_string()),
        proptest::string::string_regex(COMPONENT).unwrap(),
    ];
    proptest::collection::vec(component, 1..6)
        .prop_map(|c| c.join("/"))
        .prop_filter("at most 255 characters", |n| n.len() <= 255)
}

fn valid_tag() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}").unwrap()
}

fn valid_digest() -> impl Strategy<Value = String> {
    proptest::string::string_regex("sha256:[a-f0-9]{64}").unwrap()
}

/// Strings made mostly of the characters that matter to path handling, so random input often
/// gets near the grammar's edges.
fn pathish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2f".to_string()),
        Just("%2e".to_string()),
        Just("%00".to_string()),
        Just("\0".to_string()),
        Just("manifests".to_string()),
        Just("blobs".to_string()),
        Just("tags/list".to_string()),
        Just("uploads".to_string()),
        Just("sha256:".to_string()),
        Just(":".to_string()),
        Just("__".to_string()),
        Just("-".to_string()),
        Just("A".to_string()),
        Just("ä".to_string()),
        "[a-z0-9]{1,6}",
        "[0-9a-f]{64}",
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

/// Invariants of anything accepted as a repository name.
fn assert_safe_name(name: &str) {
    assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
    assert!(!name.starts_with('/') && !name.ends_with('/'), "{name:?}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)),
        "{name:?}"
    );
    for c in name.split('/') {
        assert!(!c.is_empty() && c != "." && c != "..", "{name:?}");
        assert!(
            !c.starts_with(['.', '_', '-']) && !c.ends_with(['.', '_', '-']),
            "{name:?}"
        );
    }
}

fn assert_safe_digest(d: &Digest) {
    let s = d.to_string();
    assert_eq!(s.len(), 7 + 64, "{s}");
    assert!(s.starts_with("sha256:"), "{s}");
    assert!(
        d.hex()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{s}"
    );
}

/// `<name>/manifests/<tag>`, `<name>/blobs/<digest>` and `<name>/tags/list` route to the pull
/// endpoints with `name`, `tag` and `digest` intact.
fn assert_pull_routes(name: &str, tag: &str, digest: &str) -> Result<(), TestCaseError> {
    match route::parse(&format!("{name}/manifests/{tag}")) {
        Ok(Endpoint::Manifest(n, Reference::Tag(t))) => {
            prop_assert_eq!(n.as_str(), name);
            prop_assert_eq!(t.as_str(), tag);
        }
        other => prop_assert!(false, "{name}/manifests/{tag}: {other:?}"),
    }
    match route::parse(&format!("{name}/blobs/{digest}")) {
        Ok(Endpoint::Blob(n, d)) => {
            prop_assert_eq!(n.as_str(), name);
            prop_assert_eq!(d.to_string(), digest);
        }
        other => prop_assert!(false, "{name}/blobs/{digest}: {other:?}"),
    }
    match route::parse(&format!("{name}/tags/list")) {
        Ok(Endpoint::Tags(n)) => prop_assert_eq!(n.as_str(), name),
        other => prop_assert!(false, "{name}/tags/list: {other:?}"),
    }
    Ok(())
}

proptest! {
    #[test]
    fn names_never_panic_and_accepted_names_are_safe(s in pathish()) {
        if let Ok(n) = RepoName::from_str(&s) {
            assert_safe_name(n.as_str());
            prop_assert_eq!(n.as_str(), s.as_str(), "names are not rewritten");
        }
    }

    #[test]
    fn grammatical_names_round_trip(s in valid_name()) {
        let n = RepoName::from_str(&s).expect("grammatical name parses");
        prop_assert_eq!(n.to_string(), s.clone());
        prop_assert_eq!(n.components().count(), s.split('/').count());
        let prefixed = n.with_library_prefix();
        assert_safe_name(prefixed.as_str());
    }

    #[test]
    fn tags_never_panic_and_round_trip(s in pathish(), t in valid_tag()) {
        if let Ok(tag) = Tag::from_str(&s) {
            prop_assert!(tag.as_str().len() <= 128);
            prop_assert!(!tag.as_str().contains(['/', '%', '\0', ':']));
            prop_assert!(tag.as_str() != "." && tag.as_str() != "..");
        }
        let tag = Tag::from_str(&t).expect("grammatical tag parses");
        prop_assert_eq!(tag.as_str(), t.as_str());
    }

    #[test]
    fn digests_never_panic_and_accepted_ones_are_hex(s in pathish(), d in valid_digest()) {
        if let Ok(parsed) = Digest::from_str(&s) {
            assert_safe_digest(&parsed);
        }
        let parsed = Digest::from_str(&d).expect("sha256 digest parses");
        prop_assert_eq!(parsed.to_string(), d);
    }

    #[test]
    fn references_never_panic(s in pathish()) {
        match Reference::from_str(&s) {
            Ok(Reference::Digest(d)) => assert_safe_digest(&d),
            Ok(Reference::Tag(t)) => prop_assert!(!t.as_str().contains(['/', '%'])),
            Err(_) => {}
        }
    }

    #[test]
    fn route_parsing_never_panics_and_yields_safe_parts(s in pathish()) {
        match route::parse(&s) {
            Ok(Endpoint::Tags(n)) => assert_safe_name(n.as_str()),
            Ok(Endpoint::Manifest(n, r)) => {
                assert_safe_name(n.as_str());
                if let Reference::Digest(d) = r {
                    assert_safe_digest(&d);
                }
            }
            Ok(Endpoint::Blob(n, d)) => {
                assert_safe_name(n.as_str());
                assert_safe_digest(&d);
            }
            Ok(_) | Err(_) => {}
        }
    }

    #[test]
    fn route_parsing_finds_structure_from_the_right(
        name in valid_name(),
        tag in valid_tag(),
        digest in valid_digest(),
    ) {
        assert_pull_routes(&name, &tag, &digest)?;
    }

    #[test]
    fn names_made_of_path_keywords_route_as_pulls_and_uploads_only_at_the_end(
        name in keyword_name(),
        tag in valid_tag(),
        digest in valid_digest(),
        id in "[a-zA-Z0-9-]{1,36}",
    ) {
        assert_pull_routes(&name, &tag, &digest)?;
        let repo: stowage::oci::RepoName = name.parse().unwrap();
        for (upload, want) in [
            (format!("{name}/blobs/uploads/"), None),
            (format!("{name}/blobs/uploads/{id}"), Some(id.clone())),
        ] {
            prop_assert_eq!(
                route::parse(&upload).ok(),
                Some(Endpoint::Upload(repo.clone(), want)),
                "{}",
                upload
            );
        }
    }

    #[test]
    fn huge_and_deep_paths_are_refused(depth in 130usize..20_000, c in "[a-z]{1,3}") {
        let path = format!("{}manifests/latest", format!("{c}/").repeat(depth));
        prop_assert!(route::parse(&path).is_err());
    }

    #[test]
    fn accept_never_panics_and_yields_bare_types(lines in proptest::collection::vec(any::<Vec<u8>>(), 0..6)) {
        let mut headers = HeaderMap::new();
        for line in &lines {
            if let Ok(v) = HeaderValue::from_bytes(line) {
                headers.append(http::header::ACCEPT, v);
            }
        }
        let accept = Accept::from_headers(&headers);
        for t in accept.types() {
            prop_assert!(!t.is_empty());
            prop_assert!(!t.contains([',', ';']), "{t:?}");
            prop_assert_eq!(t.trim(), t.as_str());
            prop_assert_eq!(t.to_ascii_lowercase(), t.clone());
        }
        let _ = accept.variant_key();
        let _ = accept.allows("application/vnd.oci.image.index.v1+json");
    }

    #[test]
    fn accept_strings_never_panic(s in any::<String>()) {
        let accept = Accept::parse(&s);
        let _ = accept.allows("application/vnd.docker.distribution.manifest.v2+json");
    }

    #[test]
    fn globs_never_panic_and_double_star_matches_all(p in "[a-z0-9*/._-]{0,40}", name in valid_name()) {
        if let Ok(pattern) = Pattern::new(&p) {
            let _ = pattern.matches(&name);
        }
        prop_assert!(Pattern::new("**").unwrap().matches(&name));
        // A name used as a literal pattern matches itself and nothing longer.
        let literal = Pattern::new(&name).unwrap();
        prop_assert!(literal.matches(&name));
        let longer = format!("{name}x");
        prop_assert!(!literal.matches(&longer));
    }

    #[test]
    fn single_star_never_crosses_a_slash(a in proptest::string::string_regex(COMPONENT).unwrap(), rest in valid_name()) {
        let p = Pattern::new(&format!("{a}/*")).unwrap();
        let deeper = format!("{a}/{rest}");
        prop_assert_eq!(p.matches(&deeper), !rest.contains('/'));
    }

    #[test]
    fn htpasswd_and_config_values_never_panic(s in any::<String>()) {
        let _ = stowage::http::auth::Htpasswd::parse(&s);
        let _ = stowage::config::parse_byte_size(&s);
        let _ = stowage::config::parse_duration(&s);
    }

    #[test]
    fn range_headers_never_panic_and_spans_stay_inside_the_blob(s in any::<String>(), size in 0u64..1 << 40) {
        use stowage::http::range::RangeRequest;
        for value in [s.clone(), format!("bytes={s}")] {
            if let RangeRequest::Single(r) = RangeRequest::parse(Some(&value)) {
                if let Some(span) = r.resolve(size) {
                    prop_assert!(span.start <= span.end && span.end < size, "{value:?} -> {span:?} of {size}");
                    prop_assert_eq!(span.len(), span.end - span.start + 1);
                }
            }
        }
    }

    #[test]
    fn well_formed_ranges_resolve_exactly(size in 1u64..1 << 40, a in any::<u64>(), b in any::<u64>(), n in 1u64..1 << 41) {
        use stowage::http::range::{RangeRequest, Span};
        let (a, b) = (a % size, b % size);
        let (a, b) = (a.min(b), a.max(b));
        let single = |v: String| match RangeRequest::parse(Some(&v)) {
            RangeRequest::Single(r) => r.resolve(size),
            other => panic!("{v:?} parsed as {other:?}"),
        };
        prop_assert_eq!(single(format!("bytes={a}-{b}")), Some(Span { start: a, end: b }));
        prop_assert_eq!(single(format!("bytes={a}-")), Some(Span { start: a, end: size - 1 }));
        prop_assert_eq!(single(format!("bytes=-{n}")), Some(Span { start: size - n.min(size), end: size - 1 }));
        prop_assert_eq!(single(format!("bytes={size}-")), None);
        prop_assert_eq!(RangeRequest::parse(Some(&format!("bytes={a}-{b}, 0-0"))), RangeRequest::Multiple);
    }
}
