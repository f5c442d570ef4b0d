"""The teacher-output bank: `ekd warm` (Ray Data), the writer it shares with the service's keys, the audit."""
