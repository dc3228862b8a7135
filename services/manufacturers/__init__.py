"""Manufacturer integrations (services.devices.ManufacturerService implementations).

`shure` is the Shure command-string client (ULX-D, QLX-D, Axient Digital on TCP 2202);
`simulator` runs receivers that speak the same protocol, for tests, demos and load.
Importing `services.manufacturers.shure` registers the "shure" service. `endpoints` holds the
global manufacturer catalog (seeded from code, extended only by the operator's CLI) and checks
receiver addresses against the device network policy (services/netpolicy.py).
"""
