//! Who may have what. [`grants`] remembers what GitLab decided per (identity, module);
//! `policy` decides, from those facts alone, what a request gets. `principal` says whose
//! grants a CI job token uses, `idtoken` what a CI ID token proves.

pub mod grants;
pub mod horizon;
pub mod idtoken;
pub mod policy;
pub mod principal;
pub mod readers;

pub use grants::{Auth, Negative};
