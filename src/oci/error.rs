//! The OCI error vocabulary: codes, their HTTP statuses and the JSON body
//! `{"errors":[{"code":..,"message":..}]}`. The HTTP edge turns a [`RegistryError`] into a
//! response in one place (`http::error`); every layer below produces these.

use std::fmt;

/// Error codes of the distribution spec (plus `UNAVAILABLE`, which distribution also uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    ManifestBlobUnknown,
    ManifestUnknown,
    ManifestInvalid,
    NameUnknown,
    NameInvalid,
    DigestInvalid,
    TagInvalid,
    SizeInvalid,
    RangeInvalid,
    PaginationNumberInvalid,
    Unsupported,
    Unauthorized,
    Denied,
    TooManyRequests,
    Unavailable,
    Unknown,
}

impl ErrorCode {
    /// The wire name, e.g. `BLOB_UNKNOWN`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status distribution uses for the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => 404,
            ErrorCode::ManifestInvalid
            | ErrorCode::BlobUploadInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::SizeInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::TagInvalid
            | ErrorCode::PaginationNumberInvalid => 400,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::Unsupported => 405,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Unknown => 500,
        }
    }
}

/// An error a client sees: an OCI code, a message, and optional extra headers' data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
    /// Overrides the code's default status (e.g. an upstream 502 passed on as 502).
    pub status: Option<u16>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RegistryError {
        RegistryError {
            code,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: Option<u64>) -> RegistryError {
        self.retry_after = seconds;
        self
    }

    /// Answers with `status` instead of the code's default.
    pub fn with_status(mut self, status: u16) -> RegistryError {
        self.status = Some(status);
        self
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        })
        .to_string()
        .into_bytes()
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RegistryError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_oci_error_shape() {
        let e = RegistryError::new(ErrorCode::BlobUnknown, "blob unknown to registry");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "blob unknown to registry");
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn statuses_match_distribution() {
        assert_eq!(ErrorCode::NameInvalid.status(), 400);
        assert_eq!(ErrorCode::Unsupported.status(), 405);
        assert_eq!(ErrorCode::TooManyRequests.status(), 429);
        assert_eq!(ErrorCode::Unavailable.status(), 503);
        assert_eq!(ErrorCode::RangeInvalid.status(), 416);
    }
}
