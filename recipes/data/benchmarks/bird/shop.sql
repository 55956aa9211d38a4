CREATE TABLE sales (region TEXT, amount INTEGER);
INSERT INTO sales VALUES ('north', 10), ('south', 5), ('north', 15);
