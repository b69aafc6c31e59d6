fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpr"));
    let mut ebpf = aya::Ebpf::load(bytes).unwrap();
    for (name, _) in ebpf.programs() { println!("{name}"); }
    let _ = ebpf.programs_mut();
}
