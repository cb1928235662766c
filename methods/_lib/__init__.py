"""Machinery that only methods use (not methods themselves; the registry skips names starting with "_").

- ``curves``: parametric curves between trained networks (Bezier, polyline) and their training; used by
  bridge networks.
- ``sparse``: weight masks, ERK densities and dynamic sparse training; used by FreeTickets and NFE.
"""
