fn main() {
    eprintln!("ovl-squash: not implemented yet");
    std::process::exit(2);
}
