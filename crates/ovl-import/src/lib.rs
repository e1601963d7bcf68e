//! ovl-import: placeholder until its issue lands.
