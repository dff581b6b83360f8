-- Orders by status: how many, and their value (revenue = paid + shipped)
SELECT status,
       count(*) AS orders,
       sum(total) AS amount
FROM {schema}.orders
GROUP BY status
ORDER BY status
