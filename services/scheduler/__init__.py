"""The scheduler service: what it learns from finished requests, when it re-plans, which live
worker gets which role, and the lease that makes one scheduler the leader
(``services.scheduler.service``)."""
