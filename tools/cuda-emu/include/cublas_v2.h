#pragma once
#include "emu/cuda_emu.h"
