//! Guest devices on the PIO bus.
