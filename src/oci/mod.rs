//! Protocol vocabulary: digests, names, references, media types and errors. Pure: nothing here
//! does I/O or knows about HTTP frameworks, and all of it is unit-tested.

pub mod convert;
pub mod digest;
pub mod error;
pub mod manifest;
pub mod media;
pub mod name;
pub mod references;
pub mod sigstore;

pub use digest::{Digest, DigestError};
pub use error::{ErrorCode, RegistryError};
pub use media::Accept;
pub use name::{NameError, Reference, ReferenceError, RepoName, Tag, TagError};
pub use references::{references, References};
