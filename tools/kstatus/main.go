// Prints kstatus's verdict on Kubernetes objects: the one Flux, kpt and cli-utils' appliers wait on.
// Reads a JSON array of objects on stdin and writes one JSON line {"status", "message"} per object,
// in order, so tests can hold the operator's conditions against the library itself rather than
// against a reading of its rules.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	out := bufio.NewWriter(os.Stdout)
	err := run(os.Stdin, out)
	if flushErr := out.Flush(); err == nil {
		err = flushErr
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	decoder := json.NewDecoder(in)
	var objects []json.RawMessage
	if err := decoder.Decode(&objects); err != nil {
		return fmt.Errorf("stdin: expected a JSON array of objects: %w", err)
	}
	if _, err := decoder.Token(); !errors.Is(err, io.EOF) {
		return errors.New("stdin: unexpected data after the array")
	}
	encoder := json.NewEncoder(out)
	for i, raw := range objects {
		u := &unstructured.Unstructured{}
		// Not encoding/json into a map: Compute reads generations with NestedInt64, which rejects
		// the float64 that a plain decode gives every number.
		if err := u.UnmarshalJSON(raw); err != nil {
			return fmt.Errorf("object %d: %w", i, err)
		}
		result, err := status.Compute(u)
		if err != nil {
			return fmt.Errorf("object %d (%s %s): %w", i, u.GetKind(), u.GetName(), err)
		}
		if err := encoder.Encode(verdict{Status: result.Status.String(), Message: result.Message}); err != nil {
			return err
		}
	}
	return nil
}
