"""`analysis`: post-hoc analysis of run stores (host side; pandas, numpy, matplotlib, seaborn).

`load` (the store as tidy frames), `energy` (the one integration), `run_energy`
(energy of every phase), `jobs` (one row per training job), `compare` (methods vs a
baseline with t-intervals; run vs run), `reproduction` (modeled vs measured memory),
`figures`, `report` (HTML + CSV). Stores with known energy for tests are written by
`harness.store.synthetic`; runs are read through `runstore.reader`.
"""
