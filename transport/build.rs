include!("../build-support/torch.rs");

fn main() {
    link_torch();
}
