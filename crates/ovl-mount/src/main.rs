fn main() {
    eprintln!("ovl-mount: not implemented yet");
    std::process::exit(2);
}
