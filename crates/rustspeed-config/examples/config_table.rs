//! Prints the key table as markdown, for regenerating docs/CONFIG.md:
//! `cargo run -p rustspeed-config --example config_table`.

fn main() {
    print!("{}", rustspeed_config::table::markdown_table());
}
