fn main() {
    eprintln!("ovl-diff: not implemented yet");
    std::process::exit(2);
}
