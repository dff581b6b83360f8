-- Stock at risk: products with less than three days of stock at the last 24 hours' sales
WITH sold AS (
    SELECT i.product_id, sum(i.qty) AS sold_24h
    FROM {schema}.order_items i
    JOIN {schema}.orders o ON o.id = i.order_id
    WHERE o.created_at >= now() - INTERVAL '24 hours'
      AND o.status NOT IN ('cancelled', 'refunded')
    GROUP BY i.product_id
)
SELECT p.id AS product_id,
       p.name,
       v.stock,
       s.sold_24h,
       round(24.0 * v.stock / s.sold_24h, 1) AS hours_of_cover
FROM sold s
JOIN {schema}.inventory v ON v.product_id = s.product_id
JOIN {schema}.products p ON p.id = s.product_id
WHERE v.stock < 3 * s.sold_24h
ORDER BY hours_of_cover, p.id
LIMIT 20
