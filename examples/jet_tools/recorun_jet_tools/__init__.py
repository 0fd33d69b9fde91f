"""An example of a recorun plugin package: modules that live outside recorun."""
