#![no_main]
// Input to vaultfs::fuzz::wallet (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::wallet(data));
