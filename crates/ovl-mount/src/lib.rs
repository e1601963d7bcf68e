//! ovl-mount: placeholder until its issue lands.
