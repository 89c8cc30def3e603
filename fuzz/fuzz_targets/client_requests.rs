#![no_main]
// Input to vaultfs::fuzz::client_requests (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::client_requests(data));
