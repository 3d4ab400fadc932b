//! `nomad-emulator`: a stand-in Nomad agent (work in progress).

fn main() {
    local_adapter::sandbox_main_if_requested();
}
