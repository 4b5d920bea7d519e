//! The store: Nix's formats (base32, hashes, paths, derivations, NAR, references) and the
//! local store on disk (validity database, locks, roots). Knows nothing of building or CI.

pub mod base32;
pub mod db;
pub mod drv;
pub mod drv_json;
pub mod drv_store;
pub mod fsutil;
pub mod hash;
pub mod local;
pub mod lock;
pub mod nar;
pub mod narinfo;
pub mod path;
pub mod refs;
pub mod roots;
pub mod signing;

pub use hash::{Algo, Hash};
pub use path::{FileIngestionMethod, StoreDir, StorePath};
