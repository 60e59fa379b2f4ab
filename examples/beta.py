"""The seed's beta regression: for each ticker, the OLS slope of its daily returns on a
market series. The market series is large and common to every call, so it is passed once
as a common keyword argument: it travels to each node once, not once per ticker.

    python -m examples.beta [--tickers 200] [--days 1000000] [--cluster node1,node2]
"""

from __future__ import annotations

import argparse

import numpy as np


def make_market(days: int, seed: int = 0) -> np.ndarray:
    """Synthetic daily market returns."""
    return np.random.default_rng(seed).normal(0.0003, 0.01, days)


def true_beta(ticker: int) -> float:
    """The beta a ticker's synthetic returns are made with (known, to check the fit)."""
    return 0.5 + (ticker % 17) / 10.0


def ticker_beta(ticker: int, market: np.ndarray) -> tuple[int, float, float]:
    """Make the ticker's returns from ``market`` and fit ``r = alpha + beta * m``.

    Returns (ticker, alpha, beta) from ordinary least squares.
    """
    rng = np.random.default_rng(10_000 + ticker)
    returns = 0.0001 * (ticker % 5) + true_beta(ticker) * market \
        + rng.normal(0.0, 0.02, market.size)
    m_mean, r_mean = market.mean(), returns.mean()
    beta = float(np.dot(market - m_mean, returns - r_mean) / np.dot(market - m_mean,
                                                                     market - m_mean))
    return ticker, float(r_mean - beta * m_mean), beta


def main() -> None:
    import deathstar

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tickers", type=int, default=200)
    parser.add_argument("--days", type=int, default=1_000_000)
    parser.add_argument("--cluster", default=None)
    ns = parser.parse_args()
    market = make_market(ns.days)
    res = deathstar.map(ticker_beta, range(ns.tickers), cluster=ns.cluster, market=market)
    worst = max(abs(beta - true_beta(t)) for t, _, beta in res)
    print(f"{len(res)} betas fitted on a market series of {market.nbytes / 1e6:.0f} MB; "
          f"largest error against the true betas: {worst:.4f}")
    for row in deathstar.node_summary(res.report):
        print(f"  {row.node}: {row.jobs_completed} jobs, {row.busy_s:.2f} busy s")


if __name__ == "__main__":
    main()
