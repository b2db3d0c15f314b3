// The handler ABI is declared in include/tracery.h; this file only gives the target a body.
#include "tracery.h"
