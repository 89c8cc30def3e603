#![no_main]
// Input to vaultfs::fuzz::file_chunks (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::file_chunks(data));
