-- Conversion from search to order per category: searches whose clicked product the same customer ordered afterwards
WITH bought AS (
    SELECT o.customer_id, i.product_id, max(o.created_at) AS last_at
    FROM {schema}.orders o
    JOIN {schema}.order_items i ON i.order_id = o.id
    WHERE o.status <> 'cancelled'
    GROUP BY o.customer_id, i.product_id
)
SELECT p.category,
       count(*) AS searches,
       count(b.customer_id) AS converted,
       round(100.0 * count(b.customer_id) / count(*), 1) AS conversion_pct
FROM {schema}.search_log s
JOIN {schema}.products p ON p.id = s.product_id
LEFT JOIN bought b ON b.customer_id = s.customer_id AND b.product_id = s.product_id AND b.last_at >= s.created_at
GROUP BY p.category
ORDER BY conversion_pct DESC, p.category
