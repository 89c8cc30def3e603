#![no_main]
// Input to vaultfs::fuzz::policy (src/fuzz.rs), which holds the oracle.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vaultfs::fuzz::policy(data));
