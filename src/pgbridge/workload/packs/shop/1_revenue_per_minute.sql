-- Revenue per minute, last 15 minutes: booked (not cancelled or refunded) and captured (paid, shipped)
SELECT date_trunc('minute', created_at) AS minute,
       count(*) AS orders,
       sum(total) FILTER (WHERE status NOT IN ('cancelled', 'refunded')) AS booked,
       sum(total) FILTER (WHERE status IN ('paid', 'shipped')) AS captured
FROM {schema}.orders
WHERE created_at >= now() - INTERVAL '15 minutes'
GROUP BY date_trunc('minute', created_at)
ORDER BY minute DESC
