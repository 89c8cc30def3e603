#![no_main]
// Input to vaultfs::fuzz::server_responses (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::server_responses(data));
