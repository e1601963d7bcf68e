//! The pinned fixtures: their one home is `ovl_tests::fixtures`, which the tests use too.

pub use ovl_tests::fixtures::*;
