#include "CTraceryAgent.h"

__attribute__((constructor)) static void tracery_agent_constructor(void) { tracery_agent_start(); }
