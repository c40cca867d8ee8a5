/* What darkapi.c (NVIDIA's runtime's private tables) and the driver modules (module.c,
   context.c) share. */
#ifndef BF_DARKAPI_H
#define BF_DARKAPI_H
#include "agent.h"

/* cuModuleLoadData's work: load an image (fatbinC wrapper, fatbin, cubin or PTX). */
CUresult bf_module_load(CUmodule *pmod, const void *image);
/* A context was destroyed (or a primary context reset): its local storage goes, destructors
   first. */
void bf_context_gone(CUcontext ctx);
#endif
