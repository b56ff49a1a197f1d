//! Launcher core (filled in step 2).
