// Latency summaries from exact samples. A run holds at most rate × seconds samples (tens of
// thousands), so sorting them all is cheap and there is no bucket error to reason about.

export interface Summary {
  count: number;
  mean: number;
  p50: number;
  p90: number;
  p95: number;
  p99: number;
  p999: number;
  max: number;
}

export const EMPTY_SUMMARY: Summary = { count: 0, mean: 0, p50: 0, p90: 0, p95: 0, p99: 0, p999: 0, max: 0 };

/** Nearest-rank percentile of an ascending array (q in 0..1). */
export function percentile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return 0;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[rank] as number;
}

/** Summary of the first `count` values of `samples` (milliseconds in, milliseconds out). */
export function summarize(samples: Float64Array, count: number): Summary {
  if (count === 0) return { ...EMPTY_SUMMARY };
  const sorted = samples.slice(0, count).sort();
  let sum = 0;
  for (const v of sorted) sum += v;
  return {
    count,
    mean: sum / count,
    p50: percentile(sorted, 0.5),
    p90: percentile(sorted, 0.9),
    p95: percentile(sorted, 0.95),
    p99: percentile(sorted, 0.99),
    p999: percentile(sorted, 0.999),
    max: sorted[count - 1] as number,
  };
}
