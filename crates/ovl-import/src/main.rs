fn main() {
    eprintln!("ovl-import: not implemented yet");
    std::process::exit(2);
}
