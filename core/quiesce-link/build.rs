//! Generates the gRPC code of `proto/quiesce/link/v1/link.proto` (needs `protoc`: the Debian
//! package protobuf-compiler, which `scripts/setup` installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/quiesce/link/v1/link.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .compile_protos(&[proto], &["proto"])
        .map_err(|e| {
            format!("generating the gRPC code of {proto} failed: {e} (is protoc installed? `apt-get install protobuf-compiler`, or run scripts/setup)").into()
        })
}
