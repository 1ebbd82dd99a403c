"""Coefficients of the normal CDF used by the fused GELU kernel (block.cc: normal_cdf).

    python -m paddle_cae.fast.kernels.cdf_coefficients      # prints both coefficient lists, highest first

* ``taylor()``: erf(a) = a * sum_n c_n (a^2)^n, c_n = 2/sqrt(pi) (-1)^n / (n! (2n + 1)), n <= 10
  (used for a < 0.75, where the remainder is below 1e-9).
* ``erfc_scaled()``: R(a) = erfc(a) exp(a^2) as a degree-10 polynomial in
  s = (t - 0.625) * 8/3 with t = 1 / (1 + a/2), so that a in [0, 6] maps to s in [-1, 1]: a
  least-squares Chebyshev fit at 4,000 Chebyshev nodes in t (relative error ~2e-9), then
  written in powers of s.
"""
import math

import numpy as np

T_LOW, T_HIGH = 1.0 / (1.0 + 0.5 * 6.0), 1.0  # t at a = 6 and a = 0


def taylor(terms=11):
    return [2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))
            for n in range(terms)]


def erfc_scaled(degree=10, nodes=4000):
    k = np.arange(nodes)
    t = np.cos(np.pi * (k + 0.5) / nodes) * (T_HIGH - T_LOW) / 2 + (T_HIGH + T_LOW) / 2
    a = (1.0 / t - 1.0) / 0.5
    r = np.array([math.erfc(v) * math.exp(v * v) for v in a])
    fit = np.polynomial.chebyshev.Chebyshev.fit(t, r, degree, domain=[T_LOW, T_HIGH])
    power = fit.convert(kind=np.polynomial.Polynomial, domain=[T_LOW, T_HIGH], window=[-1, 1])
    return [float(c) for c in power.coef]


def main():
    for name, coefs in (("Taylor c_n, in a^2", taylor()), ("R, in s", erfc_scaled())):
        print(name + " (highest power first):")
        for c in reversed(coefs):
            print(f"  {np.float32(c):.9e}f")


if __name__ == "__main__":
    main()
