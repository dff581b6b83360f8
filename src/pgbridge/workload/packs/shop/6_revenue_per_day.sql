-- Revenue per day over the whole history (captured: paid and shipped orders)
SELECT CAST(date_trunc('day', created_at) AS date) AS day,
       count(*) AS orders,
       sum(total) FILTER (WHERE status IN ('paid', 'shipped')) AS revenue,
       CAST(avg(total) AS numeric(12,2)) AS avg_order
FROM {schema}.orders
GROUP BY CAST(date_trunc('day', created_at) AS date)
ORDER BY day DESC
LIMIT 31
