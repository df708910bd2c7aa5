// Helpers for checking analytic gradients against central finite differences.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace speedrun::testing {

inline std::vector<float> random_vector(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

inline double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Numerical derivative of loss(x) along direction u at x: (L(x + h u) - L(x - h u)) / 2h.
inline double directional_derivative(const std::function<double(const std::vector<float>&)>& loss,
                                     const std::vector<float>& x, const std::vector<float>& u, double h) {
  std::vector<float> plus(x), minus(x);
  for (size_t i = 0; i < x.size(); ++i) {
    plus[i] = static_cast<float>(x[i] + h * u[i]);
    minus[i] = static_cast<float>(x[i] - h * u[i]);
  }
  return (loss(plus) - loss(minus)) / (2 * h);
}

// Per-element central differences for small inputs.
inline std::vector<double> numerical_gradient(const std::function<double(const std::vector<float>&)>& loss,
                                              const std::vector<float>& x, double h) {
  std::vector<double> g(x.size());
  std::vector<float> probe(x);
  for (size_t i = 0; i < x.size(); ++i) {
    probe[i] = static_cast<float>(x[i] + h);
    const double up = loss(probe);
    probe[i] = static_cast<float>(x[i] - h);
    const double down = loss(probe);
    probe[i] = x[i];
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// Largest |a - b| / (atol + rtol * |b|) over elements: <= 1 means within tolerance. A
// non-finite value on either side is infinitely wrong (std::max would drop a NaN ratio).
inline double worst_error_ratio(const std::vector<float>& analytic, const std::vector<double>& numeric, double atol,
                                double rtol) {
  if (analytic.size() != numeric.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < analytic.size(); ++i) {
    if (!std::isfinite(analytic[i]) || !std::isfinite(numeric[i])) return INFINITY;
    worst = std::max(worst, std::abs(analytic[i] - numeric[i]) / (atol + rtol * std::abs(numeric[i])));
  }
  return worst;
}

}  // namespace speedrun::testing
