-- Top products by booked revenue, last 24 hours
SELECT p.id AS product_id,
       p.name,
       p.category,
       sum(i.qty) AS units,
       sum(i.qty * i.unit_price) AS revenue
FROM {schema}.orders o
JOIN {schema}.order_items i ON i.order_id = o.id
JOIN {schema}.products p ON p.id = i.product_id
WHERE o.created_at >= now() - INTERVAL '24 hours'
  AND o.status NOT IN ('cancelled', 'refunded')
GROUP BY p.id, p.name, p.category
ORDER BY revenue DESC, p.id
LIMIT 10
