#![no_main]
// Input to vaultfs::fuzz::sealed_name (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::sealed_name(data));
