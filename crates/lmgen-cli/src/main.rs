fn main() {
    println!("{}", lmgen_core::version());
}
