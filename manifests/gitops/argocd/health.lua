-- Argo CD health of a kubelm.io TrainingJob or LanguageModel: one script under both kinds' keys.
-- It reads only what the operator writes (status.observedGeneration, status.phase and the kstatus
-- conditions Ready, Reconciling and Stalled), so Argo CD and Flux, which uses kstatus, agree.
-- Argo CD gives custom checks only the base, table and package libraries and part of os:
-- no string.format, no math.

local function find(conditions, wanted)
  for _, c in ipairs(conditions or {}) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function text(c)
  return c.message or c.reason or ""
end

local function says(c)
  if c.reason ~= nil and c.message ~= nil then
    return c.reason .. ": " .. c.message
  end
  return text(c)
end

local hs = {}
local generation = obj.metadata.generation
local status = obj.status
local ready = status ~= nil and find(status.conditions, "Ready") or nil
local stalled = status ~= nil and find(status.conditions, "Stalled") or nil

-- A status written for an older spec says nothing about the one in Git.
if ready == nil or status.observedGeneration == nil or status.observedGeneration < generation
    or (ready.observedGeneration ~= nil and ready.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

-- Stalled before Suspended: a suspended LanguageModel can still carry a problem a person must fix.
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = text(stalled)
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = text(ready)
elseif status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = text(ready)
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready)
else
  -- Includes a LanguageModel in phase Degraded that is not Stalled: fewer workers ready than
  -- wanted while new ones load (every scale-up), which kstatus, too, calls in progress.
  hs.status = "Progressing"
  hs.message = says(ready)
  local progress = status.progress
  if status.phase == "Running" and progress ~= nil and progress.step ~= nil then
    local steps = tostring(progress.step)
    if progress.totalSteps ~= nil then
      steps = steps .. "/" .. tostring(progress.totalSteps)
    end
    hs.message = hs.message .. " (step " .. steps .. ")"
  end
end
return hs
