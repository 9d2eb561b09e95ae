"""DP queries: counts, sums, means, histograms and quantiles of a governed dataset.

``spec`` (what an analyst asks, checked against the contract), ``plan`` (each noisy part's
epsilon, sensitivity and scale, from the contract alone), ``cells`` (groups and bins, from
the contract alone), ``noise`` (OpenDP's mechanisms and their accuracy), ``results`` (figures,
answers, quotes) and ``engine`` (``quote`` and ``run``). Nothing here reads storage: the
service reads the rows (``connectors.tables.load_table``) and passes them to ``run``.
Modules import OpenDP lazily, so importing this package stays cheap.
"""
