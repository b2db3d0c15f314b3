// The agent's C side: only the hook that starts it before `main` (Swift cannot interpose a libc
// function with its exact C signature).
#ifndef CTRACERY_AGENT_H
#define CTRACERY_AGENT_H
/// Implemented in Swift (TraceryAgent): reads TRACERY_* from the environment and starts recording.
void tracery_agent_start(void);
#endif
