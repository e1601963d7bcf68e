//! ovl-squash: placeholder until its issue lands.
