"""Analysis tools: routing figures from a checkpoint (`routing`), run comparison from TensorBoard logs (`runs`)."""
