//! ovl-layer
