"""Federated training across devices: messages, partitions, clients, server, simulated clock."""
